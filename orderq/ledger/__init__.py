"""The validation ledger's commands (stock, coupons, the review queue, region holds), used by
both the ingress (admin API) and the validate stage: the core owns them, so no stage imports
another."""
