"""The expert stage: one protocol (:mod:`.base`), the kinds by name (:mod:`.registry`)."""
