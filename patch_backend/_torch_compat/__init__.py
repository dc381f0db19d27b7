"""Every private torch symbol the package uses, fenced here (see docs/guide.md).

One module per concern: ``frame`` (the Dynamo frame and tracer a graph comes from), ``calls``
(whether a module call runs under Dynamo; functions Dynamo skips), ``sources``
(Dynamo's source names and ``nn_module_stack``), ``symbolic`` (symbolic shapes), ``inductor``
(the Inductor call). ``gates`` holds the torch version and the warn-once helper their fallbacks
share. Nothing outside this package may touch ``torch._*`` (tests/test_boundary.py checks it).
"""
