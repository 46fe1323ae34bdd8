"""One module per command family; each ``run(settings, options)`` reads top to bottom.

``cli`` parses the arguments into the typed options of ``options`` and
imports only the module of the command it runs.
"""
