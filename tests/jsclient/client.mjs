// A Matrix client for the bridge tests that sees what Element sees: matrix-js-sdk with the Rust
// crypto (@matrix-org/matrix-sdk-crypto-wasm), driven over line-delimited JSON.
//
// stdin:  {"id": 1, "cmd": "login", "args": {...}}            one request a line
// stdout: {"id": 1, "ok": true, "result": ...}                 one answer a line, in any order
//         {"id": 1, "ok": false, "error": "...", "data": ...}  (data: the Matrix error body)
// stderr: the SDK's log (level from KALANDRA_JSCLIENT_LOG, "warn" by default).
//
// Commands: login, initCrypto, bootstrapCrossSigning, start, join, waitJoined, send, timeline,
// stop. The process exits once stdin is closed and every request is answered.

import readline from "node:readline";

// matrix-js-sdk 43 asks for Node 22; on Node 20 the one Node 22 API it uses is this one.
if (!Promise.withResolvers) {
  Promise.withResolvers = () => {
    let resolve, reject;
    const promise = new Promise((res, rej) => ([resolve, reject] = [res, rej]));
    return { promise, resolve, reject };
  };
}

// stdout carries the protocol only: everything the SDK logs goes to stderr.
for (const name of ["log", "info", "debug", "trace", "warn", "error"]) {
  console[name] = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
}

const sdk = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
const { EventShieldColour, EventShieldReason } = await import("matrix-js-sdk/lib/crypto-api/index.js");
logger.setLevel(process.env.KALANDRA_JSCLIENT_LOG || "warn");

const state = { client: null, baseUrl: null, user: null, password: null };

function need(cond, what) {
  if (!cond) throw new Error(what);
}

function client() {
  need(state.client, "not logged in (login first)");
  return state.client;
}

function crypto() {
  const c = client().getCrypto();
  need(c, "crypto not initialised (initCrypto first)");
  return c;
}

async function until(predicate, what, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const commands = {
  async login({ baseUrl, user, password, deviceName }) {
    const anonymous = sdk.createClient({ baseUrl });
    const response = await anonymous.loginRequest({
      type: "m.login.password",
      identifier: { type: "m.id.user", user },
      password,
      initial_device_display_name: deviceName ?? "kalandra jsclient",
    });
    Object.assign(state, { baseUrl, user: response.user_id, password });
    state.client = sdk.createClient({
      baseUrl,
      userId: response.user_id,
      deviceId: response.device_id,
      accessToken: response.access_token,
    });
    return { userId: response.user_id, deviceId: response.device_id };
  },

  async initCrypto() {
    // In memory: no IndexedDB in Node, and each test run is a new device anyway.
    await client().initRustCrypto({ useIndexedDB: false });
    const keys = await crypto().getOwnDeviceKeys();
    return { ed25519: keys.ed25519, curve25519: keys.curve25519 };
  },

  async bootstrapCrossSigning() {
    const password = state.password;
    await crypto().bootstrapCrossSigning({
      // Synapse asks for the password (user-interactive auth) unless the account has no
      // cross-signing keys yet; try without, then with the session it answered.
      authUploadDeviceSigningKeys: async (makeRequest) => {
        try {
          await makeRequest(null);
        } catch (error) {
          const session = error?.data?.session;
          if (error?.httpStatus !== 401 || !session) throw error;
          await makeRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: state.user },
            password,
            session,
          });
        }
      },
    });
    const status = await crypto().getCrossSigningStatus();
    return { ready: await crypto().isCrossSigningReady(), status };
  },

  async start({ timeoutMs = 30000 } = {}) {
    const c = client();
    let timer;
    const prepared = new Promise((resolve, reject) => {
      const onSync = (syncState, _prev, data) => {
        if (syncState === "PREPARED" || syncState === "SYNCING") {
          c.off(sdk.ClientEvent.Sync, onSync);
          resolve();
        } else if (syncState === "ERROR") {
          c.off(sdk.ClientEvent.Sync, onSync);
          reject(data?.error ?? new Error("sync failed"));
        }
      };
      c.on(sdk.ClientEvent.Sync, onSync);
      timer = setTimeout(() => reject(new Error(`no first sync within ${timeoutMs} ms`)), timeoutMs);
    });
    await c.startClient({ initialSyncLimit: 50 });
    try {
      await prepared;
    } finally {
      clearTimeout(timer);
    }
    return {};
  },

  async join({ roomId, timeoutMs = 30000 }) {
    await client().joinRoom(roomId);
    return commands.waitJoined({ roomId, timeoutMs });
  },

  // The room is joined as far as this client's sync knows, and its encryption state is known
  // (sending earlier could go out unencrypted or miss the members' devices).
  async waitJoined({ roomId, timeoutMs = 30000 }) {
    const c = client();
    await until(() => c.getRoom(roomId)?.getMyMembership() === "join", `joining ${roomId}`, timeoutMs);
    const encrypted = c.getCrypto() ? await c.getCrypto().isEncryptionEnabledInRoom(roomId) : false;
    return { encrypted };
  },

  async send({ roomId, body, msgtype = "m.text" }) {
    const sent = await client().sendMessage(roomId, { msgtype, body });
    return { eventId: sent.event_id };
  },

  // The room's events as the server lists them (/messages, newest back to `limit`), oldest
  // first, each decrypted now (a room key that came since is used) with its shield.
  async timeline({ roomId, limit = 200 }) {
    const c = client();
    const raw = [];
    let from = null;
    while (raw.length < limit) {
      const page = await c.createMessagesRequest(roomId, from, Math.min(100, limit - raw.length), sdk.Direction.Backward);
      raw.push(...page.chunk);
      if (!page.chunk.length || !page.end) break;
      from = page.end;
    }
    raw.reverse();
    const out = [];
    for (const json of raw) out.push(await describe(c, json));
    return out;
  },

  async stop() {
    if (state.client) state.client.stopClient();
    return {};
  },
};

async function describe(c, json) {
  // A fresh event each time: an event the SDK failed to decrypt before is not retried by it.
  const event = new sdk.MatrixEvent(json);
  if (event.isEncrypted()) await c.decryptEventIfNeeded(event);
  const content = event.getContent();
  const described = {
    eventId: event.getId(),
    sender: event.getSender(),
    type: event.getType(),
    wireType: event.getWireType(),
    stateKey: event.getStateKey() ?? null,
    decryptionFailure: event.isDecryptionFailure(),
    decryptionFailureReason: event.decryptionFailureReason ?? null,
    redacted: event.isRedacted(),
    msgtype: content.msgtype ?? null,
    body: content.body ?? null,
    relation: content["m.relates_to"] ?? null,
    content,
    shieldColour: null,
    shieldReason: null,
  };
  if (event.isEncrypted() && !event.isDecryptionFailure() && c.getCrypto()) {
    const info = await c.getCrypto().getEncryptionInfoForEvent(event);
    if (info) {
      described.shieldColour = EventShieldColour[info.shieldColour] ?? String(info.shieldColour);
      described.shieldReason =
        info.shieldReason === null ? null : (EventShieldReason[info.shieldReason] ?? String(info.shieldReason));
    }
  }
  return described;
}

function answer(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

let inFlight = 0;
let closed = false;

function exitWhenIdle() {
  if (closed && inFlight === 0) {
    if (state.client) state.client.stopClient();
    process.exit(0);
  }
}

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", async (line) => {
  if (!line.trim()) return;
  let request;
  try {
    request = JSON.parse(line);
  } catch (error) {
    answer({ id: null, ok: false, error: `not JSON: ${error.message}` });
    return;
  }
  const { id, cmd, args } = request;
  const handler = Object.hasOwn(commands, cmd) ? commands[cmd] : null;
  if (!handler) {
    answer({ id, ok: false, error: `unknown command ${JSON.stringify(cmd)}` });
    return;
  }
  inFlight += 1;
  try {
    answer({ id, ok: true, result: (await handler(args ?? {})) ?? null });
  } catch (error) {
    answer({ id, ok: false, error: `${cmd}: ${error?.message ?? error}`, data: error?.data ?? null });
  } finally {
    inFlight -= 1;
    exitWhenIdle();
  }
});
// stdin closed: answer what is under way, then exit.
lines.on("close", () => {
  closed = true;
  exitWhenIdle();
});
