// Package netident owns a host's network identity during failover: adding
// and removing service IPs with netlink, announcing them (gratuitous ARP,
// unsolicited neighbour advertisement), adapter mapping and hostname. It
// never decides when to fail over.
package netident
