package repl

import "github.com/doppelha/doppel/blockdev"

// pageWriteMax caps one write to the backend. The page cache allocates a
// folio as large as the write (ext4 large folios): on this VM, whose
// balloon reports free memory back to the host, a 1 MiB write into
// memory the host took back costs ~10x a 256 KiB one (dd of 1 GiB into a
// fresh file, memory idle for 8 s: 2.8-3.0 s in 1 MiB writes, 0.23-0.37 s
// in 256 KiB ones, 1.3 s in 512 KiB; 0.25-0.47 s each when the memory was
// just freed). That was the 3x spread of the mirror's speed.
const pageWriteMax = 256 << 10

// writeAt writes p at off in pieces of at most pageWriteMax bytes.
func writeAt(b blockdev.Backend, p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), pageWriteMax)
		if _, err := b.WriteAt(p[:n], off); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// applyTo is blockdev.ApplyTo with writes split by writeAt.
func applyTo(b blockdev.Backend, m *blockdev.Mutation) error {
	if m.Op == blockdev.OpWrite && len(m.Data) > pageWriteMax {
		return writeAt(b, m.Data, m.Offset)
	}
	return blockdev.ApplyTo(b, m)
}
