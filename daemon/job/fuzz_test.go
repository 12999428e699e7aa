package job

import (
	"encoding/json"
	"testing"
)

// FuzzSpec: whatever a client sends, decoding, defaulting and validating a
// spec never panics, and a spec that validates survives a JSON round trip
// unchanged in meaning (it validates again).
func FuzzSpec(f *testing.F) {
	good, _ := json.Marshal(validSpec())
	f.Add(good)
	f.Add([]byte(`{"name":"web","monitor":{"interval":1,"missed":-1}}`))
	f.Add([]byte(`{"service_ips":[{"prefix":"::/0","iface":""}],"map_iface":{"":""}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var s Spec
		if json.Unmarshal(b, &s) != nil {
			return
		}
		s.Defaults()
		if s.Validate() != nil {
			return
		}
		b2, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		var s2 Spec
		if err := json.Unmarshal(b2, &s2); err != nil {
			t.Fatal(err)
		}
		if err := s2.Validate(); err != nil {
			t.Fatalf("valid spec invalid after a round trip: %v", err)
		}
	})
}

// FuzzParsers: the command-line parsers never panic and what they accept
// is within bounds.
func FuzzParsers(f *testing.F) {
	for _, s := range []string{"172.17.22.187/24@eth0", "interval=250ms,missed=8", "1G", "64K", "fd00::1/64@e", "missed=3,interval=50ms"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ip, err := ParseServiceIP(s); err == nil && (ip.Iface == "" || ip.Prefix == "") {
			t.Fatalf("ParseServiceIP(%q) = %+v", s, ip)
		}
		if m, err := ParseMonitor(s); err == nil && (m.Interval < MinInterval || m.Missed < MinMissed) {
			t.Fatalf("ParseMonitor(%q) = %+v below the minimum", s, m)
		}
		if n, err := ParseSize(s); err == nil && n <= 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
		_ = ValidName("job", s)
	})
}
