"""Text generation for every stage after training: one continuously batched engine (engine.py) behind
`weitiao serve`, `chat`, the web UI and `eval`."""
