"""Tools beside the product: ``orderq bench`` (:mod:`loadtest.bench`) with its load generator and
reference endpoint, the dev cluster of ``orderq cluster-dev``, the locust scenarios and the
client-side oracle (see README)."""
