package console

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/client"
	"golang.org/x/time/rate"
)

const testPassword = "correct horse battery"

// testConsole is a console with one configured (unreachable) server whose
// token is known, served over TLS by httptest.
type testConsole struct {
	c      *Console
	srv    *httptest.Server
	cfg    string
	token  string
	client *http.Client
}

func newTestConsole(t *testing.T) *testConsole {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	cfg, err := client.LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	token := "0123456789abcdef0123456789abcdef"
	cfg.Put(client.Server{Name: "vm1", Addr: "127.0.0.1:1", Fingerprint: "sha256:" + strings.Repeat("ab", 32), Token: token})
	if err := cfg.Save(); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(dir, "password")
	if err := WritePasswordFile(pw, testPassword); err != nil {
		t.Fatal(err)
	}
	c, err := New(Options{ConfigPath: cfgPath, PasswordFile: pw})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(c.Handler())
	t.Cleanup(srv.Close)
	return &testConsole{c: c, srv: srv, cfg: cfgPath, token: token, client: newBrowser(t, srv)}
}

// newBrowser is a client with a cookie jar that does not follow
// redirects (the tests look at them).
func newBrowser(t *testing.T, srv *httptest.Server) *http.Client {
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	cl := srv.Client()
	cl.Jar = jar
	cl.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return cl
}

var loginTokenRE = regexp.MustCompile(`name="login_token" value="([^"]+)"`)

// login posts secret through the login form; it returns the response.
func (tc *testConsole) login(t *testing.T, cl *http.Client, secret string) *http.Response {
	t.Helper()
	resp, err := cl.Get(tc.srv.URL + "/login")
	if err != nil {
		t.Fatal(err)
	}
	body := readAll(t, resp)
	m := loginTokenRE.FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no login token in the login page:\n%s", body)
	}
	req, _ := http.NewRequest(http.MethodPost, tc.srv.URL+"/login", strings.NewReader(url.Values{"login_token": {m[1]}, "password": {secret}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", tc.srv.URL)
	resp, err = cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func readAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return b.String()
}

func sessionCookieOf(resp *http.Response) *http.Cookie {
	for _, c := range resp.Cookies() {
		if c.Name == sessionCookie && c.Value != "" {
			return c
		}
	}
	return nil
}

// csrfOf logs in cl and returns the session's CSRF token.
func (tc *testConsole) csrfOf(t *testing.T, cl *http.Client) string {
	t.Helper()
	resp := tc.login(t, cl, testPassword)
	readAll(t, resp)
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("login: %s", resp.Status)
	}
	resp, err := cl.Get(tc.srv.URL + "/api/session")
	if err != nil {
		t.Fatal(err)
	}
	body := readAll(t, resp)
	m := regexp.MustCompile(`"csrf":"([^"]+)"`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no csrf in /api/session: %s", body)
	}
	return m[1]
}

func TestLoginRefusesWrongPasswordAndToken(t *testing.T) {
	tc := newTestConsole(t)
	for _, secret := range []string{"wrong password", tc.token + "x", strings.ToUpper(tc.token), ""} {
		cl := newBrowser(t, tc.srv)
		resp := tc.login(t, cl, secret)
		body := readAll(t, resp)
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, "wrong password or token") {
			t.Errorf("login with %q: %s, want 401 wrong password or token", secret, resp.Status)
		}
		if c := sessionCookieOf(resp); c != nil {
			t.Errorf("login with %q set a session cookie", secret)
		}
		// And the API stays closed.
		resp, err := cl.Get(tc.srv.URL + "/api/state")
		if err != nil {
			t.Fatal(err)
		}
		readAll(t, resp)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("after a refused login, /api/state: %s, want 401", resp.Status)
		}
	}
}

func TestLoginWithPasswordOrToken(t *testing.T) {
	tc := newTestConsole(t)
	for _, tt := range []struct{ secret, who string }{{testPassword, "admin"}, {tc.token, "token of vm1"}} {
		cl := newBrowser(t, tc.srv)
		resp := tc.login(t, cl, tt.secret)
		readAll(t, resp)
		if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/" {
			t.Fatalf("login as %s: %s to %q, want 303 to /", tt.who, resp.Status, resp.Header.Get("Location"))
		}
		c := sessionCookieOf(resp)
		if c == nil {
			t.Fatalf("login as %s: no session cookie", tt.who)
		}
		if !c.Secure || !c.HttpOnly || c.SameSite != http.SameSiteStrictMode {
			t.Errorf("session cookie: Secure %t HttpOnly %t SameSite %v, want all strict", c.Secure, c.HttpOnly, c.SameSite)
		}
		resp, err := cl.Get(tc.srv.URL + "/api/session")
		if err != nil {
			t.Fatal(err)
		}
		if body := readAll(t, resp); resp.StatusCode != http.StatusOK || !strings.Contains(body, `"who":"`+tt.who+`"`) {
			t.Errorf("/api/session as %s: %s %s", tt.who, resp.Status, body)
		}
		resp, err = cl.Get(tc.srv.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		if body := readAll(t, resp); resp.StatusCode != http.StatusOK || !strings.Contains(body, "/static/app.js") {
			t.Errorf("GET / logged in: %s", resp.Status)
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe") {
			t.Errorf("Content-Security-Policy %q", csp)
		}
	}
}

func TestPageNeedsLogin(t *testing.T) {
	tc := newTestConsole(t)
	cl := newBrowser(t, tc.srv)
	resp, err := cl.Get(tc.srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Errorf("GET / without a session: %s to %q, want 303 to /login", resp.Status, resp.Header.Get("Location"))
	}
	for _, path := range []string{"/api/state", "/api/stream", "/api/session", "/api/jobs/web/events", "/api/jobs/web/plan/failover"} {
		resp, err := cl.Get(tc.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		readAll(t, resp)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s without a session: %s, want 401", path, resp.Status)
		}
	}
}

// TestLoginFormToken: a login posted without the login page's token (a
// form another site submits) or from another origin is refused, even with
// the right password.
func TestLoginFormToken(t *testing.T) {
	tc := newTestConsole(t)
	cl := newBrowser(t, tc.srv)
	post := func(form url.Values, origin string) *http.Response {
		req, _ := http.NewRequest(http.MethodPost, tc.srv.URL+"/login", strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		readAll(t, resp)
		return resp
	}
	if resp := post(url.Values{"password": {testPassword}, "login_token": {"made-up"}}, ""); resp.StatusCode != http.StatusForbidden || sessionCookieOf(resp) != nil {
		t.Errorf("login without the form's token: %s, want 403 and no session", resp.Status)
	}
	// The real form token, but posted from elsewhere.
	resp, err := cl.Get(tc.srv.URL + "/login")
	if err != nil {
		t.Fatal(err)
	}
	m := loginTokenRE.FindStringSubmatch(readAll(t, resp))
	if resp := post(url.Values{"password": {testPassword}, "login_token": {m[1]}}, "https://evil.example"); resp.StatusCode != http.StatusForbidden || sessionCookieOf(resp) != nil {
		t.Errorf("login from another origin: %s, want 403 and no session", resp.Status)
	}
}

// TestActionsNeedCSRF: every request that changes something is refused
// without the session's CSRF token, with a wrong one, or from another
// origin — and nothing changes; with the token it reaches the action.
func TestActionsNeedCSRF(t *testing.T) {
	tc := newTestConsole(t)
	cl := newBrowser(t, tc.srv)
	csrf := tc.csrfOf(t, cl)
	do := func(method, path, body, token, origin string) (int, string) {
		req, _ := http.NewRequest(method, tc.srv.URL+path, strings.NewReader(body))
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		if token != "" {
			req.Header.Set(csrfHeader, token)
		}
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, readAll(t, resp)
	}
	requests := []struct{ method, path, body string }{
		{"POST", "/api/jobs/web/actions/failover", `{"force":true}`},
		{"POST", "/api/jobs/web/actions/delete", `{}`},
		{"POST", "/api/jobs", `{"name":"web","source":"vm1","target":"vm2","volume":"/dev/vdb"}`},
		{"POST", "/api/servers", `{"name":"evil","addr":"127.0.0.1:1","fingerprint":"sha256:` + strings.Repeat("cd", 32) + `","token":"0123456789abcdef0123"}`},
		{"DELETE", "/api/servers/vm1", ""},
		{"POST", "/logout", ""},
	}
	for _, r := range requests {
		for _, bad := range []struct{ token, origin, why string }{
			{"", "", "no token"},
			{"wrong-" + csrf, "", "wrong token"},
			{csrf, "https://evil.example", "right token, other origin"},
		} {
			code, body := do(r.method, r.path, r.body, bad.token, bad.origin)
			if code != http.StatusForbidden || !strings.Contains(body, `"kind":"csrf"`) {
				t.Errorf("%s %s with %s: %d %s, want 403 csrf", r.method, r.path, bad.why, code, body)
			}
		}
	}
	// Nothing changed: the server list is as it was, the session lives.
	cfg, err := client.LoadConfig(tc.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Servers) != 1 || cfg.Servers[0].Name != "vm1" {
		t.Errorf("servers after refused requests: %+v, want vm1 only", cfg.Servers)
	}
	if code, _ := do("GET", "/api/state", "", "", ""); code != http.StatusOK {
		t.Errorf("session after refused logout: /api/state %d, want 200", code)
	}
	// With the token and the console's own origin, the request passes the
	// gate: the action runs (and fails on its own terms: no agent knows
	// the job).
	code, body := do("POST", "/api/jobs/web/actions/pause", `{}`, csrf, tc.srv.URL)
	if code == http.StatusForbidden || !strings.Contains(body, `not found`) {
		t.Errorf("pause with the CSRF token: %d %s, want the job not found", code, body)
	}
	code, body = do("DELETE", "/api/servers/vm1", "", csrf, tc.srv.URL)
	if code != http.StatusOK {
		t.Errorf("remove server with the CSRF token: %d %s", code, body)
	}
	if cfg, _ := client.LoadConfig(tc.cfg); len(cfg.Servers) != 0 {
		t.Errorf("servers after remove: %+v", cfg.Servers)
	}
}

func TestLoginRateLimited(t *testing.T) {
	tc := newTestConsole(t)
	tc.c.ss.failures = rate.NewLimiter(rate.Every(time.Hour), 3)
	for i := range 3 {
		resp := tc.login(t, newBrowser(t, tc.srv), "wrong")
		readAll(t, resp)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("wrong login %d: %s, want 401", i+1, resp.Status)
		}
	}
	// Beyond the burst even the right password waits: nothing is checked.
	resp := tc.login(t, newBrowser(t, tc.srv), testPassword)
	if body := readAll(t, resp); resp.StatusCode != http.StatusTooManyRequests || sessionCookieOf(resp) != nil || !strings.Contains(body, "too many") {
		t.Errorf("login after 3 wrong ones: %s, want 429 and no session", resp.Status)
	}
}

func TestSessionExpires(t *testing.T) {
	tc := newTestConsole(t)
	cl := newBrowser(t, tc.srv)
	tc.csrfOf(t, cl)
	now := time.Now()
	tc.c.ss.now = func() time.Time { return now.Add(sessionTTL + time.Minute) }
	resp, err := cl.Get(tc.srv.URL + "/api/state")
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("after the session's TTL: %s, want 401", resp.Status)
	}
}

func TestPasswordHash(t *testing.T) {
	line, err := HashPassword("s3cret-pass")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(line, "s3cret") {
		t.Fatal("the hash line holds the password")
	}
	if !checkPassword(line, "s3cret-pass") {
		t.Error("the password does not match its own hash")
	}
	if checkPassword(line, "s3cret-pasS") {
		t.Error("another password matches")
	}
	if a, b := NewPassword(), NewPassword(); len(a) != 20 || a == b {
		t.Errorf("NewPassword: %q %q", a, b)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "pw")
	if err := WritePasswordFile(p, "x-password"); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("password file mode: %v %v", fi.Mode(), err)
	}
}

func FuzzCheckPassword(f *testing.F) {
	f.Add("pbkdf2-sha256$1$00$00", "x")
	f.Add("pbkdf2-sha256$2$abcd$0011223344", "")
	f.Add("", "")
	f.Add("pbkdf2-sha256$999999999$00$00", "y")
	f.Fuzz(func(t *testing.T, line, pw string) {
		if iter, _, _, err := parsePasswordLine(line); err == nil && iter <= 1000 {
			checkPassword(line, pw) // must not panic
		}
	})
}

// TestStreamSendsState: the event stream sends the snapshot at once and
// again at each round.
func TestStreamSendsState(t *testing.T) {
	tc := newTestConsole(t)
	cl := newBrowser(t, tc.srv)
	tc.csrfOf(t, cl)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, tc.srv.URL+"/api/stream", nil)
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	buf := make([]byte, 64<<10)
	read := func() string {
		var got strings.Builder
		for !strings.Contains(got.String(), "\n\n") {
			n, err := resp.Body.Read(buf)
			got.Write(buf[:n])
			if err != nil {
				t.Fatalf("stream: %v (%q)", err, got.String())
			}
		}
		return got.String()
	}
	if first := read(); !strings.HasPrefix(first, "event: state\ndata: {") {
		t.Fatalf("first event %q", first)
	}
	go tc.c.Sample(ctx) // the one server is unreachable: a new snapshot says so
	if second := read(); !strings.Contains(second, `"name":"vm1"`) || !strings.Contains(second, `"reachable":false`) {
		t.Fatalf("second event %q", second)
	}
}

// FuzzCreateRequest: any new-job form (JSON) is refused with an error or
// turned into a spec that carries its name, volume and a fresh secret;
// nothing panics.
func FuzzCreateRequest(f *testing.F) {
	f.Add(`{"name":"web","source":"vm1","target":"vm2","volume":"/dev/vdb","service_ips":["172.17.22.187/24@eth0"],"monitor":"interval=200ms,missed=5","failover":"auto","arbiter":"etcd","lease_ttl":"3s"}`)
	f.Add(`{"name":"web","volume":"/v","size":"1G","map_iface":["eth0=ens3"],"scripts":["post-failover=/x.sh"]}`)
	f.Add(`{"name":"Bad Name"}`)
	f.Add(`{"name":"web","volume":"/v","lease_ttl":"-1s"}`)
	f.Add(`{"name":"web","volume":"/v","map_iface":["eth0"]}`)
	f.Fuzz(func(t *testing.T, body string) {
		var req CreateRequest
		if json.Unmarshal([]byte(body), &req) != nil {
			return
		}
		spec, err := specFromRequest(req)
		if err != nil {
			return
		}
		if spec.Name != strings.TrimSpace(req.Name) || spec.Volume == "" || len(spec.Secret) != 64 || spec.UUID == "" {
			t.Fatalf("spec %+v from %q", spec, body)
		}
	})
}
