"""One YAML per environment. A package only so that the wheel ships them (as `depop_embed.conf`)."""
