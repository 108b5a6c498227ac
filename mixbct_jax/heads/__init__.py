"""Classification heads.

The margin softmax over sharded class centres (``sharded_fc``, ``margin``), the plain linear softmax
(``softmax``) and the frozen prototype classifier of BCT/UniBCT (``prototypes``).
"""
