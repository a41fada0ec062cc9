"""How a flow runs: the flow decorator, its parameters, the batch run, fan-out over a work pool."""
