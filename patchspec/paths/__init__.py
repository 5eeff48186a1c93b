"""Path patching: which sender's effect reaches the metric through which receiver.

:class:`PathSpec` says what (senders, receivers, direct or through MLPs); :mod:`.engine`
computes it exactly, many (sender, receiver) rows per forward pass.
"""
