"""Analyses over the captured graph: they find what can be pruned and change nothing in the model.

``linears`` (the prunable linear ops, each tied to its module and weight layout) → ``structure`` (one propagation of
labels over the aten graph: every linear output feature labelled with its weight row, one handler per op in
``ophandlers``, ``ops_shape``, ``ops_reduce``, ``ops_attention``, ``ops_einsum``, ``ops_conv``, over the union-find of ``labels``; the
labels are written to ``node.meta``) → ``groups`` (head, KV-group and neuron ``GroupSet``s, plus the experts of
``experts``; a model that exports only in parts is analysed by its largest exportable pieces). ``feature_dims`` follows features through a
module's traced forward for the size rewrites of ``transforms.reshapes``. Every one of them, and the export's attention
fusion, names ops through ``op_names`` (aten's names, whatever level the op was seen at).
"""
