"""Measuring a trained run (``evaluate``) and sampling text from it (``sampling``)."""
