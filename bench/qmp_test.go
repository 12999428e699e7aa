package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// fakeQMP serves a QMP conversation on one end of a pipe: the greeting,
// then for each command the lines answer returns (events before the
// reply are allowed), recording the commands received.
func fakeQMP(t *testing.T, answer func(cmd string, args map[string]any) []string) (*QMP, *[]string) {
	t.Helper()
	client, server := net.Pipe()
	var got []string
	go func() {
		defer server.Close()
		if _, err := server.Write([]byte(`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}` + "\n")); err != nil {
			return
		}
		r := bufio.NewReader(server)
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			var msg struct {
				Execute   string         `json:"execute"`
				Arguments map[string]any `json:"arguments"`
			}
			if err := json.Unmarshal(line, &msg); err != nil {
				return
			}
			got = append(got, msg.Execute)
			for _, l := range answer(msg.Execute, msg.Arguments) {
				if _, err := server.Write([]byte(l + "\n")); err != nil {
					return
				}
			}
		}
	}()
	q, err := NewQMP(client)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q, &got
}

func TestQMP(t *testing.T) {
	polls := 0
	q, got := fakeQMP(t, func(cmd string, args map[string]any) []string {
		switch cmd {
		case "qmp_capabilities":
			return []string{`{"return": {}}`}
		case "blockdev-mirror":
			if args["copy-mode"] != "write-blocking" {
				return []string{`{"error": {"class": "GenericError", "desc": "bad copy-mode"}}`}
			}
			return []string{`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "m0"}}`, `{"return": {}}`}
		case "query-block-jobs":
			polls++
			if polls < 3 {
				return []string{`{"return": [{"device": "m0", "type": "mirror", "len": 8192, "offset": 4096, "ready": true, "status": "ready"}]}`}
			}
			return []string{`{"return": [{"device": "m0", "type": "mirror", "len": 8192, "offset": 8192, "ready": true, "status": "ready"}]}`}
		}
		return []string{`{"error": {"class": "CommandNotFound", "desc": "The command ` + cmd + ` has not been found"}}`}
	})
	if _, err := q.Execute("blockdev-mirror", map[string]any{"job-id": "m0", "copy-mode": "write-blocking"}); err != nil {
		t.Fatal(err)
	}
	if len(q.Events) != 1 || q.Events[0].Event != "JOB_STATUS_CHANGE" {
		t.Errorf("events %+v", q.Events)
	}
	_, err := q.Execute("blockdev-mirror", map[string]any{"copy-mode": "other"})
	var qe *QMPError
	if !errors.As(err, &qe) || qe.Class != "GenericError" || !strings.Contains(err.Error(), "blockdev-mirror") {
		t.Errorf("error reply: %v", err)
	}
	j, err := q.WaitJob(context.Background(), "m0", 5*time.Second, MirrorSynced)
	if err != nil || j.Offset != 8192 || polls != 3 {
		t.Errorf("WaitJob: %+v, %v after %d polls", j, err, polls)
	}
	if _, err := q.Job("other"); !errors.Is(err, ErrNoJob) {
		t.Errorf("unknown job: %v", err)
	}
	if want := "qmp_capabilities blockdev-mirror blockdev-mirror query-block-jobs query-block-jobs query-block-jobs query-block-jobs"; strings.Join(*got, " ") != want {
		t.Errorf("commands %v, want %s", *got, want)
	}
}

func TestQMPBadGreeting(t *testing.T) {
	client, server := net.Pipe()
	go func() {
		server.Write([]byte("SSH-2.0-OpenSSH\n"))
		server.Close()
	}()
	if _, err := NewQMP(client); err == nil || !strings.Contains(err.Error(), "not a QMP greeting") {
		t.Errorf("NewQMP on a non-QMP peer: %v", err)
	}
}
