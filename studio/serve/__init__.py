"""The serving path, one module per process.

    ui.py, inputs.py   the web server's process: Gradio widgets -> studio.params dataclasses
    pool.py            the same process: queues jobs, one thread and one worker process per device
    protocol.py        what travels between the two processes (plain dataclasses, no torch)
    runner.py          the worker process: models on the device, one handler per job kind

One request: a UI handler turns the form into the job kind's parameters (studio.params), checks them
and submits them to the pool; the pool sends them to a free worker; the runner checks them again,
runs the kind's handler (HANDLERS) through the pipeline, streams a ScaleUpdate per scale, saves the
PNGs and sends the JobResult; the UI yields each state to the browser as {widget: value}.

A new job kind touches three files: studio/params.py (its dataclass, and its entry in JOBS),
studio/serve/runner.py (its handler, and its entry in HANDLERS) and studio/serve/ui.py (its tab,
its handler method and its endpoint); its API docs go to docs/api.md.
"""
