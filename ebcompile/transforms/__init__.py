"""Transforms of the user's model, each with its invariant in its module docstring.

``masks`` (insert / strip the mask parametrizations: inverses of each other; the function is unchanged until a
ticket is applied) → ``shrink`` (``compact``: physically remove pruned units; does not preserve shapes, preserves
the masked model's function, checked by ``verify`` on the example inputs), helped by ``counts`` (head counts and
widths a forward reads), ``reshapes`` (size arguments of a traced forward), ``carry`` (modes and ``requires_grad``).
"""
