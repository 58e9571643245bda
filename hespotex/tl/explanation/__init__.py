"""Explanations: the decoder's attention between spots (``_attention``), attributions to image pixels and
neighbouring spots (``_explain``) and the diagnostic patches that drive a gene or domain (``_diagnostic``)."""
