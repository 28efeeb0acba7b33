"""The pure decision core: no I/O, no clock, no logging. Data in, a decision out."""
