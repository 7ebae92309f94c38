"""Black-box conformance suite: cases per interface, a runner and `prismctl conformance`."""
