"""The per-user agent: one background process that owns tunnels beyond one command.

Like ssh-agent or OpenSSH's ControlPersist: the first `pam tunnel start --background` starts it,
every later shell process of the same user talks to it over a Unix socket (mode 0600 in a
0700 directory, and a peer-credential check), and it exits after an idle time with no tunnels.
"""
