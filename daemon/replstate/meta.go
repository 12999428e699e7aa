package replstate

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// The state handshake runs on the replication connection before the
// engine's own hello: the source writes metaMagic, then both sides trade
// length-prefixed JSON messages. A target that does not see the magic
// hands the connection to the engine unchanged (a source without a state
// dir).
var metaMagic = [4]byte{'D', 'P', 'R', 'S'}

// maxMeta bounds one handshake message (a bitmap of a 64 TiB volume in
// 64 KiB chunks, fully dirty, encodes in about 130 MiB; far beyond what a
// handshake should carry, so the bound is generous but finite).
const maxMeta = 256 << 20

// ErrMalformed reports an unreadable handshake message.
var ErrMalformed = errors.New("malformed state handshake message")

// hello is the source's opening message.
type hello struct {
	VolumeSize int64  `json:"volume_size"`
	ChunkSize  int64  `json:"chunk_size"`
	Gen        []byte `json:"gen"` // generation.State binary
	StreamID   uint64 `json:"stream_id"`
	Acked      uint64 `json:"acked_seq"`
	Discard    string `json:"discard,omitempty"` // "target": the operator resolved a split brain against the target
	// Notify: the source finished a resync (its bitmap is empty and the
	// target durably holds it): the target takes its generation; no
	// replication follows on this connection.
	Notify bool `json:"notify,omitempty"`
	// Job is the source's job incarnation (empty: not bound): a target
	// bound to another incarnation refuses it.
	Job string `json:"job,omitempty"`
	// Epoch is the source's failover epoch, the fencing token (0: not
	// known): a target that knows a newer one refuses the source.
	Epoch uint64 `json:"epoch,omitempty"`
}

// reply is the target's answer.
type reply struct {
	Gen      []byte `json:"gen"`
	StreamID uint64 `json:"stream_id"`
	Applied  uint64 `json:"applied_seq"` // durable, as the target persisted it
	Data     string `json:"data_state"`  // the engine's view: consistent | inconsistent
	Bitmap   []byte `json:"bitmap,omitempty"`
	Discard  string `json:"discard,omitempty"` // the target's own --discard-on
	Error    string `json:"error,omitempty"`
	// Epoch is the newest epoch the target knows; above the source's, the
	// source was superseded and must fence itself.
	Epoch uint64 `json:"epoch,omitempty"`
}

// commit is the source's decision.
type commit struct {
	Outcome string `json:"outcome"`
	Reason  string `json:"reason"`
	Refused bool   `json:"refused,omitempty"`
	// Resync: the union of both bitmaps is not empty (or a full mirror
	// follows): the target is inconsistent until the source notifies it.
	Resync bool `json:"resync,omitempty"`
	// Adopt: the target takes the source's generation now (nothing to
	// resync beyond the ordered stream).
	Adopt bool `json:"adopt,omitempty"`
	// Discard: save the target's divergent chunks, then resync (split
	// brain resolved against the target).
	Discard bool `json:"discard,omitempty"`
	// Full: a whole-volume mirror follows (the target held no generation):
	// the target stays without one until it completes.
	Full bool   `json:"full,omitempty"`
	Gen  []byte `json:"gen"`
}

// done is the target's last word.
type done struct {
	Error string `json:"error,omitempty"`
	Saved string `json:"saved,omitempty"` // split-brain save path
}

func writeMsg(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > maxMeta {
		return fmt.Errorf("state handshake message of %d bytes exceeds %d", len(b), maxMeta)
	}
	buf := make([]byte, 4, 4+len(b))
	binary.BigEndian.PutUint32(buf, uint32(len(b)))
	_, err = w.Write(append(buf, b...))
	return err
}

func readMsg(r io.Reader, v any) error {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return err
	}
	l := binary.BigEndian.Uint32(n[:])
	if l > maxMeta {
		return fmt.Errorf("%w: length %d", ErrMalformed, l)
	}
	b := make([]byte, l)
	if _, err := io.ReadFull(r, b); err != nil {
		return err
	}
	return decodeMsg(b, v)
}

func decodeMsg(b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return nil
}
