package api

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// Limits of the control API's server (defaults of the Server's fields).
const (
	// DefaultMaxConns caps the connections served at once (the CLI and
	// the peer agent need a handful).
	DefaultMaxConns = 128
	// DefaultReadHeaderTimeout bounds the TLS handshake and a request's
	// header; DefaultBodyTimeout a request's body.
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultBodyTimeout       = 30 * time.Second
	// DefaultIdleTimeout closes a keep-alive connection idle that long.
	DefaultIdleTimeout = 60 * time.Second
	// rejectTimeout bounds the answer to a connection beyond the cap;
	// maxRejecting bounds how many are answered at once (the others are
	// closed without an answer).
	rejectTimeout = 2 * time.Second
	maxRejecting  = 16
)

// limitListener caps the connections open at once. A connection beyond
// the cap is not left waiting: it is answered, at most maxRejecting at a
// time on goroutines of their own, with an HTTP 503 whose JSON body says
// why (kind "busy"), then closed.
type limitListener struct {
	net.Listener
	slots     chan struct{}
	rejecting chan struct{}
	reject    func(net.Conn)
}

// newLimitListener serves at most cap(slots) connections of l at once
// (slots may be shared by successive listeners).
func newLimitListener(l net.Listener, slots chan struct{}, reject func(net.Conn)) *limitListener {
	return &limitListener{Listener: l, slots: slots, rejecting: make(chan struct{}, maxRejecting), reject: reject}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &slotConn{Conn: c, free: func() { <-l.slots }}, nil
		default:
		}
		select {
		case l.rejecting <- struct{}{}:
			go func() {
				defer func() { <-l.rejecting }()
				l.reject(c)
			}()
		default:
			c.Close()
		}
	}
}

// slotConn gives its slot back when closed (once).
type slotConn struct {
	net.Conn
	once sync.Once
	free func()
}

func (c *slotConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.free)
	return err
}

// rejectBusy answers a connection beyond the cap: TLS handshake, the
// request's header read, 503 with a JSON error, close; all within
// rejectTimeout.
func rejectBusy(cfg *tls.Config, max int) func(net.Conn) {
	body, _ := json.Marshal(errorBody{
		Error: fmt.Sprintf("agent busy: %d control API connections open, the most it serves at once; retry", max),
		Kind:  "busy",
	})
	resp := fmt.Sprintf("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s\n",
		len(body)+1, body)
	return func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(rejectTimeout))
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			return
		}
		if _, err := http.ReadRequest(bufio.NewReader(io.LimitReader(tc, 64<<10))); err != nil {
			return
		}
		io.WriteString(tc, resp)
	}
}
