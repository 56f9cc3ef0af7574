"""The reference signaling router and gateway (aiohttp + aiortc + asyncssh).

Modules: config (TOML settings), router (HTTP + WebSocket signaling), agent (the gateway's
router link and actions), answerer (one aiortc peer per conversation), targets (TCP and SSH),
recording (asciicast v2), embedded (router + gateway in a background thread), demo_ssh (a
throwaway SSH server). `pam-gateway` (__main__) runs them; docs/GATEWAY.md says how.
Nothing is imported here, so `pam-gateway --help` stays fast.
"""
