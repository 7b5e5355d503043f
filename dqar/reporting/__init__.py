"""Reports from result dicts: findings, Markdown, figures and document sections; imports no study."""
