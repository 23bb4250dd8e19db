"""Compiler passes over a captured graph. Analyses write ``node.meta``; transforms change the model."""
