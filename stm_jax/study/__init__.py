"""The reproduction study: experiments as data, run plans, launching, summary, claims, report."""
