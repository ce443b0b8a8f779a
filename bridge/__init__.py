"""Matrix appservice bridge for Kalandra rooms (mautrix-python).

Not built yet: the bridge arrives after the Kalandra server and client (see README, "Status").
"""
