"""The top layer: the command line (`cli`), its stages (`stages`: parse arguments, call recipes,
write files), the results layout and file formats (`results`) and the report's tables
(`report_tables`)."""
