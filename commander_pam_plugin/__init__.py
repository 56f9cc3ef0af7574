"""commander-pam-plugin: `pam launch` and `pam tunnel` over WebRTC data channels."""

__version__ = "0.1.0"
