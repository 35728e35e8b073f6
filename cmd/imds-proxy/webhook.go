package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/serving"
	"github.com/imds-proxy/imds-proxy/webhook"
)

func newWebhookCommand(stderr io.Writer) *ffcli.Command {
	var f injectFlags
	fs := newFlagSet("imds-proxy webhook", stderr)
	f.register(fs, true)
	listen := fs.String("listen", ":8443", "HTTPS address of "+webhook.InjectPath+" and /healthz")
	certFile := fs.String("tls-cert", "", "TLS certificate file (PEM), re-read when it changes")
	keyFile := fs.String("tls-key", "", "TLS private key file (PEM), re-read when it changes")
	metricsListen := fs.String("metrics-listen", fmt.Sprintf(":%d", imdsapi.AdminPort), "plain-HTTP address of /metrics (imds_proxy_webhook_admissions_total by result); empty disables it")
	logFormat := fs.String("log-format", "json", "log format: json or console")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	return &ffcli.Command{
		Name:       "webhook",
		ShortUsage: "imds-proxy webhook --tls-cert FILE --tls-key FILE [flags]",
		ShortHelp:  "serve the Kubernetes mutating admission webhook that injects the sidecar",
		LongHelp: "Answers AdmissionReview v1 requests for pods on " + webhook.InjectPath + " with a JSONPatch that adds\n" +
			"the same sidecar as `imds-proxy inject k8s`. The MutatingWebhookConfiguration's selectors\n" +
			"choose the pods (deploy/kubernetes/webhook). Pods that already have exactly the sidecar\n" +
			"(or the sidecar-init variant exempting --exempt-uid) are admitted unchanged, their --v1\n" +
			"raised to --v1-floor (by default --v1). Pods that would run without it (opted out,\n" +
			"hostNetwork, clashing with its ports or volume, or with a container named imds-proxy\n" +
			"that is not exactly the sidecar) are admitted unchanged in --allow-opt-out-namespaces;\n" +
			"elsewhere they are violations, admitted with a warning (result=\"warned\") or, with\n" +
			"--on-violation=deny, refused (result=\"denied\"). So are pods with a container that could\n" +
			"bypass the sidecar (privileged or NET_ADMIN; in the variant, able to become the exempt\n" +
			"UID), which get or keep the sidecar where they are admitted." + envHelp,
		FlagSet: fs,
		Options: parseOptions(),
		Exec: flagsOnly("imds-proxy webhook", func(ctx context.Context) error {
			if *certFile == "" || *keyFile == "" {
				return errors.New("--tls-cert and --tls-key are required: the API server calls webhooks over HTTPS only")
			}
			o, err := f.options()
			if err != nil {
				return err
			}
			log, err := newLogger(*logFormat, *logLevel, stderr)
			if err != nil {
				return err
			}
			certs, err := webhook.NewCertReloader(*certFile, *keyFile, log)
			if err != nil {
				return err
			}
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			h, err := webhook.NewHandler(o, log, reg)
			if err != nil {
				return err
			}
			srv := serving.NewHTTPServer(h, log)
			srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.GetCertificate}
			servers := &serving.Set{}
			if err := servers.Listen("tcp", *listen, srv, nil); err != nil {
				return fmt.Errorf("--listen %s: %w", *listen, err)
			}
			if err := servers.ListenAdmin(*metricsListen, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), log); err != nil {
				servers.Close()
				return err
			}
			log.Info("serving", zap.String("listen", servers.Addr(0)), zap.String("path", webhook.InjectPath),
				zap.String("metrics_listen", servers.AdminAddr()))
			return servers.Run(ctx, serving.Lifecycle{Timeout: shutdownGrace}, log)
		}),
	}
}

// shutdownGrace is how long in-flight admission requests may take after
// SIGTERM; the API server's own timeout for them is at most 30 s.
const shutdownGrace = 10 * time.Second
