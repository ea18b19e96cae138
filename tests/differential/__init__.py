"""Differential test of the exit path: the same guest code in plain Unicorn (RAM) and through mmiosplit.

The access goes to a RAM window in one run and to a scratch device holding the same bytes in the other.
`generate` makes seeded random instances of every load/store class `decode()` accepts, `program` lays a batch of
them out as one guest program, `runners` runs it both ways, and `campaign` compares the results (and is the
command-line script: ``python -m tests.differential.campaign --instances N --seed S``).
"""
