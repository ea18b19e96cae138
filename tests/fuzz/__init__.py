"""Fuzz targets (atheris): one module per target, each with ``TestOneInput(data: bytes)``.

``python -m tests.fuzz.campaign --target T --inputs N`` runs one; ``test_fuzz_quick.py`` runs every target for a
small fixed number of seeded inputs in the default test run. docs/fuzzing.md says what each target checks.
"""
