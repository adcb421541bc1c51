"""The offline OpenAI simulator: Files, Batches, Images and Models as the official SDK sees them.

Run it with ``imagebatch simulator`` / ``python -m simulator`` (:mod:`simulator.cli`), or mount
``simulator.app.create_app(SimulatorConfig(...))`` as an ASGI app. Modules by role: ``config``
(settings), ``app`` (routes), ``files`` (the file store), ``batches`` (the batch lifecycle),
``generation`` (image requests: checks, tokens, responses), ``images`` (drawing and encoding),
``limits`` (rate limits, injected failures), ``stats`` (what was billed), ``errors`` (OpenAI's
error envelope).
"""
