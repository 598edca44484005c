"""Job handlers' logic, free of wiring: `tasks` declares them as actors on the configured broker.

Importing these modules starts nothing, so tests and other entry points can use them on their own broker.
"""
