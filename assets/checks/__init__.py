"""Asset checks, one property each, grouped by the assets they guard."""
