"""End-to-bridge encryption on the Matrix side: Megolm in portals and the bot's device
(e2ee.py), a device of each ghost's own (ghost_devices.py), and MSC4350 impersonation
(msc4350.py)."""
