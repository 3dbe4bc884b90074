"""hvlab's network: the virtual switch, pcap capture, Scapy endpoints and flows, the default topology.

Import from the submodules (``hvlab.net.switch``, ``.traffic``, ``.topology``, ``.pcap``, ``.tap``); this
package stays import-light so that a NIC model pulling in the switch does not pull in Scapy.
"""
