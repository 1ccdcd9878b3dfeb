"""The `orchestratord` command line: serve, scheduler tools, job client, simulation, bench."""
