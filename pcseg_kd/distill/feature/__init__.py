"""Feature distillers of the paper's Appendix C (FitNet, RKD, PKT, SP, CRD)."""
