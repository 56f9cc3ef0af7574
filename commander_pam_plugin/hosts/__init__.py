"""Host adapters: each makes a real or reference shell a pluggy host for `commander.plugins`.

`keeper.py` adapts Keeper Commander (`keeper-pam`); the reference host still lives in
`commander_pam_plugin/shell.py` (it moves here later, see DESIGN.md).
"""
