package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
)

// TestDeleteRefusedWhileInUse: while an application is connected to the
// job's export, delete is refused (409 in_use) naming the client, and the
// job goes on replicating; status lists the users. Forced, the delete
// goes through and the client loses its connection.
func TestDeleteRefusedWhileInUse(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	ctx := context.Background()
	app := p.nbd("vm1")
	defer app.Close()
	st := p.status("vm1")
	if len(st.Data.Users) != 1 || !strings.Contains(st.Data.Users[0], "NBD client pid ") {
		t.Fatalf("status users %q", st.Data.Users)
	}
	_, err := p.agents["vm1"].client.DeleteJobWith(ctx, "web", api.DeleteOptions{})
	if !api.IsKind(err, "in_use") || !strings.Contains(err.Error(), "NBD client pid ") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("delete while in use: %v", err)
	}
	if _, err := app.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("the application lost its disk to a refused delete: %v", err)
	}
	p.waitProtected("vm1")
	// The target's side has no users: its delete is not refused.
	if len(p.status("vm2").Data.Users) != 0 {
		t.Fatal("the target reports users")
	}
	if _, err := p.agents["vm1"].client.DeleteJobWith(ctx, "web", api.DeleteOptions{Force: true}); err != nil {
		t.Fatalf("forced delete: %v", err)
	}
	if _, err := app.WriteAt(make([]byte, 4096), 0); err == nil {
		t.Fatal("the client still writes to a deleted job's volume")
	}
}

// TestAgentStopWaitsForUsers: a stop request (API) is refused while a
// volume is in use; SIGTERM's stop keeps serving while it is, and stops
// once the application disconnects.
func TestAgentStopWaitsForUsers(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	ctx := context.Background()
	a1 := p.agents["vm1"]
	app := p.nbd("vm1")
	if _, err := a1.client.StopAgent(ctx, api.StopOptions{}); !api.IsKind(err, "in_use") || !strings.Contains(err.Error(), "job web: NBD client pid ") {
		t.Fatalf("stop while in use: %v", err)
	}
	a1.a.Shutdown(false)
	time.Sleep(1500 * time.Millisecond)
	select {
	case err := <-a1.done:
		t.Fatalf("the agent stopped while its volume was in use (%v)", err)
	default:
	}
	if _, err := app.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("the application lost its disk to a stop that should wait: %v", err)
	}
	app.Close()
	select {
	case err := <-a1.done:
		if err != nil {
			t.Fatal(err)
		}
		a1.cancel = nil // stopped
	case <-time.After(5 * time.Second):
		t.Fatal("the agent did not stop once its volume was released")
	}
}
