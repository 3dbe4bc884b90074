"""The guest agent: the host runs commands and moves files in the guest over a dedicated serial port."""
