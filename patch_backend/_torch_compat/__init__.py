"""Every private torch symbol the package uses, fenced here (see docs/guide.md)."""
