package repl

// Accessors for a persistent-state layer (daemon/replstate) that decides
// when the source is tracking rather than replicating, and that releases
// its activity-log extents only once the target made a change durable.

// Connected reports whether a session with the target is established.
func (s *Stream) Connected() bool {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	return s.conn
}

// Progress returns the last sequence the target applied and the last it
// made durable (fsynced) in this stream.
func (s *Stream) Progress() (applied, durable uint64) {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	return s.acked, s.durable
}
