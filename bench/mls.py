"""MLS group operations at scale: processing commits, joining, saving and loading state.

Setup (not measured, its duration is printed): one creator commits a single Add of N-1
KeyPackages. Three of them belong to "real" members spread over the tree (leaves ~N/3, ~2N/3
and N-1) who join from the Welcome; the other holders never join. The real members then take
turns making self-update and remove commits (removing members who never joined), and every
other real member processes each one.

N = 1,000 and 10,000 with ``--full`` (10,000 is the roadmap's room size), N = 100 in quick mode,
so CI stays fast. Building the 10,000-member group (10k KeyPackages and one Add commit, a few
minutes) is cached on disk, see :func:`_setup`; everything measured runs on real MLS messages
every time.

Figures, all in ms:

* processing a self-update / a remove commit made by another member: the median over all
  (commit, receiving member) pairs, each checked to advance the receiver's epoch by one.
  Targets (docs/performance-targets.md): under 100 ms per commit at 1,000 members, under
  200 ms at 10,000; the limit is the target itself, so a ratio under 1 is within target.
* joining from the Welcome (``MlsGroup.join``) and, once, from a Welcome that the real member
  at the last leaf makes after the commits (its tree has their paths; a joiner checks the
  GroupInfo against its signer's leaf), saving (serializing the library state, which
  every processed commit does for its rollback point) and loading
  (``MlsGroup.from_bytes``) a member's state: best of several runs. The limit is N x one
  Ed25519 signature verification (``nacl.signing.VerifyKey.verify``), measured in the same
  run: the physical floor of checking every leaf's signature once (a join must). Targets at
  10,000 members: join under 2 s, save and load under 500 ms each (none at 1,000).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import cbor2
from nacl.signing import SigningKey

from kalandra_core.mls.group import MlsGroup
from kalandra_core.mls.keypackage import KeyPackageBundle, build_key_package

from .common import Figure, Results, rate

T = TypeVar("T")

_CREATOR_ID = 1
_CACHE_FORMAT = 1
_CACHE_FROM = 5_000  # groups this big are cached on disk between runs


@dataclass(frozen=True, slots=True)
class _Size:
    n: int
    updates: int
    removes: int
    join_repeats: int
    state_batch: int
    state_repeats: int
    commit_target_ms: float
    join_target_ms: float | None  # None: no target at this size
    state_target_ms: float | None


QUICK_SIZES = (_Size(100, 6, 3, 3, 5, 3, 100.0, None, None),)
FULL_SIZES = (
    _Size(1_000, 8, 4, 1, 1, 5, 100.0, None, None),
    _Size(10_000, 3, 2, 1, 1, 3, 200.0, 2_000.0, 500.0),
)


@dataclass(slots=True)
class _Setup:
    creator: MlsGroup
    welcome: bytes
    real: list[KeyPackageBundle]  # the members who join, in leaf order
    phantoms: list[int]  # member ids who never join
    summary: str


def _timed(fn: Callable[[], T], cpu: list[float] | None = None) -> tuple[T, float]:
    """One call of ``fn`` with the garbage collector off: (result, milliseconds). The process's
    CPU milliseconds go to ``cpu`` if given: on a shared machine, wall time includes waiting."""
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        if gc_was_enabled:
            gc.enable()
    if cpu is not None:
        cpu.append(elapsed_cpu * 1000)
    return result, elapsed * 1000


def _ms(fn: Callable[[], object], batch: int, repeats: int) -> float:
    """Best-of milliseconds per call of ``fn`` (see :func:`rate`)."""
    return 1000 / rate(fn, batch, repeats)


def _distribute(
    group: list[MlsGroup],
    committer: MlsGroup,
    commit: bytes,
    samples: list[float],
    cpu: list[float],
) -> None:
    """Every real member except the committer processes ``commit`` (timed); then the committer
    merges it. Each timed ``process`` must move its member to the next epoch."""
    for member in group:
        if member is committer:
            continue
        before = member.epoch
        result, ms = _timed(partial(member.process, commit), cpu)
        if result.kind != "commit" or result.epoch != before + 1 or member.epoch != before + 1:
            raise AssertionError(f"member {member.member_id} did not advance: {result}")
        samples.append(ms)
    if committer.process(commit).kind != "own_commit":
        raise AssertionError("the committer did not merge its own commit")
    epochs = {m.epoch for m in group}
    if len(epochs) != 1:
        raise AssertionError(f"members disagree on the epoch: {epochs}")


def run(quick: bool) -> Results:
    # One Ed25519 verification (the floor of every join, save and load) is measured once.
    signer = SigningKey.generate()
    signed = signer.sign(os.urandom(128))  # about a LeafNodeTBS worth of bytes
    verify_key = signer.verify_key
    verify_ms = _ms(lambda: verify_key.verify(signed), 2_000, 5 if quick else 15)
    results = Results()
    for size in QUICK_SIZES if quick else FULL_SIZES:
        results.figures += _run_size(size, verify_ms)
    return results


def _setup(n: int) -> _Setup:
    """The creator's group after one Add of N-1 members (merged) and the Welcome of the three
    real members. Groups of _CACHE_FROM members or more are cached on disk (KALANDRA_BENCH_CACHE,
    else ~/.cache/kalandra-bench): building one is setup, not what is measured, and the
    cached state goes through the same ``MlsGroup.from_bytes`` as any saved group."""
    path = _cache_dir() / f"mls-{n}-v{_CACHE_FORMAT}.cbor" if n >= _CACHE_FROM else None
    if path is not None and path.exists():
        t0 = time.perf_counter()
        try:
            cached = cbor2.loads(path.read_bytes())
            creator = MlsGroup.from_bytes(cached["creator"])
            real = [KeyPackageBundle.from_bytes(b) for b in cached["real"]]
            if len(creator.members()) == n:
                return _Setup(
                    creator,
                    cached["welcome"],
                    real,
                    list(cached["phantoms"]),
                    f"setup: the {n}-member group from {path} "
                    f"({time.perf_counter() - t0:.1f} s; delete it to rebuild)",
                )
        except Exception as exc:  # a stale or damaged cache is rebuilt
            print(f"mls N={n}: cache {path} unusable ({type(exc).__name__}), rebuilding")

    t0 = time.perf_counter()
    creator = MlsGroup.create(_CREATOR_ID, os.urandom(32))
    real_positions = {(n - 1) // 3, 2 * (n - 1) // 3, n - 2}  # indices into the Add list
    bundles: list[KeyPackageBundle] = [
        build_key_package(1000 + i, os.urandom(32)) for i in range(n - 1)
    ]
    t_kps = time.perf_counter()
    out = creator.add([b.key_package for b in bundles])
    t_add = time.perf_counter()
    if creator.process(out.commit).kind != "own_commit":
        raise AssertionError("the creator did not merge the Add")
    if len(creator.members()) != n:
        raise AssertionError(f"expected {n} members, got {len(creator.members())}")
    t_merge = time.perf_counter()
    real = [bundles[i] for i in sorted(real_positions)]
    welcome = out.welcomes[real[0].member_id]
    if any(out.welcomes[b.member_id] != welcome for b in real):
        raise AssertionError("one Add commit, one Welcome")
    phantoms = [b.member_id for i, b in enumerate(bundles) if i not in real_positions]
    summary = (
        f"setup: {t_merge - t0:.1f} s ({n - 1} KeyPackages {t_kps - t0:.1f} s, "
        f"Add commit {t_add - t_kps:.1f} s ({len(out.commit) / 1024:,.0f} KB), "
        f"merge {t_merge - t_add:.1f} s, Welcome {len(welcome) / 1024:,.0f} KB)"
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(
            cbor2.dumps(
                {
                    "creator": creator.to_bytes(),
                    "welcome": welcome,
                    "real": [b.to_bytes() for b in real],
                    "phantoms": phantoms,
                }
            )
        )
        tmp.replace(path)
        summary += f"; cached in {path}"
    return _Setup(creator, welcome, real, phantoms, summary)


def _cache_dir() -> Path:
    configured = os.environ.get("KALANDRA_BENCH_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "kalandra-bench"


def _run_size(size: _Size, verify_ms: float) -> list[Figure]:
    n = size.n
    setup = _setup(n)
    creator = setup.creator
    print(f"mls N={n} {setup.summary}")

    joiners: list[MlsGroup] = []
    join_ms: list[float] = []
    join_cpu: list[float] = []
    for bundle in setup.real:
        for _ in range(size.join_repeats):
            joined, ms = _timed(partial(MlsGroup.join, setup.welcome, bundle), join_cpu)
            join_ms.append(ms)
        if joined.epoch != creator.epoch or len(joined.members()) != n:
            raise AssertionError("the joiner is not in the N-member group")
        joiners.append(joined)

    group = [creator, *joiners]
    phantoms = setup.phantoms

    # --- commits: self-updates and removes by rotating committers ----------------------------
    t_commits = time.perf_counter()
    update_ms: list[float] = []
    commit_cpu: list[float] = []
    for k in range(size.updates):
        committer = group[k % len(group)]
        _distribute(group, committer, committer.self_update().commit, update_ms, commit_cpu)
    remove_ms: list[float] = []
    for k in range(size.removes):
        committer = group[(k + 1) % len(group)]
        removal = committer.remove([phantoms[k * (len(phantoms) // size.removes)]])
        _distribute(group, committer, removal.commit, remove_ms, commit_cpu)
    if len(creator.members()) != n - size.removes:
        raise AssertionError("the removes did not shrink the group")
    t_commits = time.perf_counter() - t_commits

    # --- state persistence (a receiving member's state, after all the commits above) --------
    member = joiners[0]
    blob = member.to_bytes()
    # Serialize the live library state: the work every processed commit pays to keep its
    # rollback point, which ``to_bytes`` then only wraps.
    save_ms = _ms(lambda: member._lib.to_bytes(), size.state_batch, size.state_repeats)
    load_ms = _ms(lambda: MlsGroup.from_bytes(blob), size.state_batch, size.state_repeats)
    if MlsGroup.from_bytes(blob).epoch != member.epoch:
        raise AssertionError("state did not round-trip")

    # --- a join from a Welcome made by the member at the last leaf, after the commits ---------
    adder = joiners[-1]
    newcomer = build_key_package(999_999_999, os.urandom(32))
    added = adder.add([newcomer.key_package])
    adder.process(added.commit)
    late_cpu: list[float] = []
    late, late_ms = _timed(
        partial(MlsGroup.join, added.welcomes[newcomer.member_id], newcomer), late_cpu
    )
    if late.epoch != adder.epoch or late.tree_hash != adder.tree_hash:
        raise AssertionError("the late joiner is not in the group")
    floor = verify_ms * n

    print(
        f"mls N={n} samples (ms): update {_spread(update_ms)}; remove {_spread(remove_ms)}; "
        f"join {_spread(join_ms)}; state blob {len(blob) / 1024:,.0f} KB; "
        f"one Ed25519 verify {verify_ms * 1000:.1f} us; commits made and processed "
        f"{t_commits:.1f} s; CPU time (ms, this process): join {_spread(join_cpu)}, "
        f"processing a commit {_spread(commit_cpu)}, join from the last leaf's Welcome "
        f"{late_cpu[0]:.1f}"
    )

    commit_target = f"< {size.commit_target_ms:,.0f} ms"
    floor_name = f"{n:,} x Ed25519 verify"
    join_target = _target_text(size.join_target_ms)
    state_target = _target_text(size.state_target_ms)
    return [
        Figure(
            f"process self-update commit, N={n:,}",
            statistics.median(update_ms),
            "ms",
            commit_target,
            "target",
            size.commit_target_ms,
            decimals=1,
        ),
        Figure(
            f"process remove commit, N={n:,}",
            statistics.median(remove_ms),
            "ms",
            commit_target,
            "target",
            size.commit_target_ms,
            decimals=1,
        ),
        Figure(
            f"join from Welcome, N={n:,}", min(join_ms), "ms", join_target, floor_name, floor, 1
        ),
        Figure(
            f"join from the last leaf's Welcome, N={n:,}",
            late_ms,
            "ms",
            join_target,
            floor_name,
            floor,
            1,
        ),
        Figure(
            f"save state (serialize), N={n:,}", save_ms, "ms", state_target, floor_name, floor, 1
        ),
        Figure(
            f"load state (from_bytes), N={n:,}", load_ms, "ms", state_target, floor_name, floor, 1
        ),
    ]


def _target_text(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"< {ms / 1000:g} s" if ms >= 1000 else f"< {ms:,.0f} ms"


def _spread(samples: list[float]) -> str:
    return (
        f"min {min(samples):.1f} / median {statistics.median(samples):.1f} / "
        f"max {max(samples):.1f} (n={len(samples)})"
    )
