"""Kalandra members the bridge holds or shows: the members of bridged Matrix users, whose keys
the bridge holds (bridged_users.py, their send chains: send_chains.py), the bot's own sends
(bot_send.py), and the ghosts of native members in Matrix (puppet.py, their display names:
ghost_profile.py)."""
