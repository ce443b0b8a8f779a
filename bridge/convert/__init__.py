"""Pure conversions between Matrix and Kalandra content: sanitized HTML (formatting.py), media
info and thumbnails (media_info.py), relayed messages' text (relay.py)."""
