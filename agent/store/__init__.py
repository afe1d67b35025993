"""The agent's state on disk: the SQLite lease table (the only SQL) and the credential file.

Kept free of imports so `jitmesh-agent check` can load `readonly` alone and start fast.
"""
