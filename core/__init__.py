"""The foundation every layer shares: target tasks, raw datasets and the base error. numpy only."""
