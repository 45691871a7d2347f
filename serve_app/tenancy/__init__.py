"""Multi-tenancy: API keys, rate limits, usage metering and credit."""
