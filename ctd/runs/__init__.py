"""Published runs: layout and publish (:mod:`.layout`), the lease, a night's set-up (:mod:`.job`), the
history of nights, verification and fetching."""
