--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: audit_log_is_append_only(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.audit_log_is_append_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: _sqlx_migrations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public._sqlx_migrations (
    version bigint NOT NULL,
    description text NOT NULL,
    installed_on timestamp with time zone DEFAULT now() NOT NULL,
    success boolean NOT NULL,
    checksum bytea NOT NULL,
    execution_time bigint NOT NULL
);


--
-- Name: audit_head; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.audit_head (
    only_row boolean DEFAULT true NOT NULL,
    seq bigint NOT NULL,
    hash text NOT NULL,
    CONSTRAINT audit_head_only_row_check CHECK (only_row)
);


--
-- Name: audit_log; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.audit_log (
    seq bigint NOT NULL,
    record text NOT NULL,
    CONSTRAINT audit_log_seq_check CHECK ((seq >= 1))
);


--
-- Name: destroyed_versions; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.destroyed_versions (
    tenant_id text NOT NULL COLLATE pg_catalog."C",
    version bigint NOT NULL,
    destroyed_at_ms bigint NOT NULL,
    CONSTRAINT destroyed_versions_version_check CHECK ((version >= 1))
);


--
-- Name: subject_keys; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.subject_keys (
    tenant_id text NOT NULL COLLATE pg_catalog."C",
    subject_key_id bytea NOT NULL,
    wrapped bytea NOT NULL,
    tenant_version bigint NOT NULL,
    created_at_ms bigint NOT NULL,
    CONSTRAINT subject_keys_subject_key_id_check CHECK ((length(subject_key_id) = 16))
);


--
-- Name: subject_tombstones; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.subject_tombstones (
    tenant_id text NOT NULL COLLATE pg_catalog."C",
    subject_key_id bytea NOT NULL,
    shredded_at_ms bigint NOT NULL,
    CONSTRAINT subject_tombstones_subject_key_id_check CHECK ((length(subject_key_id) = 16))
);


--
-- Name: tenant_keys; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.tenant_keys (
    tenant_id text NOT NULL COLLATE pg_catalog."C",
    version bigint NOT NULL,
    wrapped bytea NOT NULL,
    root_key_id text NOT NULL,
    created_at_ms bigint NOT NULL,
    CONSTRAINT tenant_keys_version_check CHECK ((version >= 1))
);


--
-- Name: tenants; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.tenants (
    tenant_id text NOT NULL COLLATE pg_catalog."C",
    created_at_ms bigint NOT NULL,
    primary_version bigint NOT NULL,
    shredded_at_ms bigint,
    index_key_wrapped bytea,
    index_key_root text,
    tier text DEFAULT 'shared'::text NOT NULL,
    region text,
    root_key text,
    root_key_deletion_at_ms bigint,
    policy text DEFAULT '{}'::text NOT NULL,
    CONSTRAINT tenants_check CHECK (((shredded_at_ms IS NULL) = (index_key_wrapped IS NOT NULL))),
    CONSTRAINT tenants_tier_check CHECK ((tier = ANY (ARRAY['shared'::text, 'dedicated'::text, 'customer'::text])))
);


--
-- Data for Name: _sqlx_migrations; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public._sqlx_migrations VALUES (1, 'keystore', '2026-12-01 12:03:10.379722+00', true, '\x088365d0d234baf1a7c13ae514cd5564a0ab708e289dc5b9196d91d982ae826e2813616c3e24004ffca3ce8f039d94fb', 78204579);
INSERT INTO public._sqlx_migrations VALUES (2, 'policies', '2026-12-01 12:03:10.470094+00', true, '\x5a0721195385f547c2124ffb718d3be7f9961dbd5de6823dd15142bea691d8f7ed8d2831361822180ec2677f177c3305', 27810021);
INSERT INTO public._sqlx_migrations VALUES (3, 'audit', '2026-12-01 12:03:10.504883+00', true, '\x7a43acb13dcce763a76c0f19f29063e1ddd7661de37f2d7fbb0907757542bc5f66bc63d1792857d4fee7fe01aff49b99', 37075755);


--
-- Data for Name: audit_head; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.audit_head VALUES (true, 0, '0000000000000000000000000000000000000000000000000000000000000000');


--
-- Data for Name: audit_log; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: destroyed_versions; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: subject_keys; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.subject_keys VALUES ('legacy-a', '\x9f40736fa5e0b3cc58cb540f293a3668', '\x01010100000001c7f8d019f88f78e2e5782c378471a723b56cca3983b68efa077c487cf99800fa218dade2780a616af90c54124e5fb216e49c6a0fbd2e2da76cc8ced63802afba19585f9f566772960ac83b47', 1, 1796126591227);
INSERT INTO public.subject_keys VALUES ('legacy-b', '\x121529fc03a9a104fdaacd407535c1c0', '\x01010100000001487d1a6296a75d707c874d20705d6473167b2d085241c036868d6216e90cd7547ce4625788a38c2d698b3763ec0cb9871ad4bf25ebbde965e53f9235a98fbf0287cf914f71bdf8f0231e4699', 1, 1796126591405);
INSERT INTO public.subject_keys VALUES ('legacy-a', '\xea9d09f0a4ad525ed5e8678938974275', '\x01010100000002ae26b9d919474143e14ee5e2f8343e2ae1b4d908bf35cd40c95aa176720d6bd898ec5750427e957fb69951c2a35824cdd77589cf03c36a585337fb66373183e97ac0dd695511f8186d591f10', 2, 1796126591635);


--
-- Data for Name: subject_tombstones; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.subject_tombstones VALUES ('legacy-a', '\xac132f1833a0b92894c3612b14efc4e6', 1796126591844);


--
-- Data for Name: tenant_keys; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.tenant_keys VALUES ('legacy-a', 1, '\x2e3580595e51888da84dc27f58f3288b3e3f547f822361a3a3e429dd0542d2b678e0e82713bef2db47ba1d4e89b3881d7958c1575b894456c48b923f', 'local:a0346f83cc808343', 1796126590751);
INSERT INTO public.tenant_keys VALUES ('legacy-b', 1, '\x1ae1c5e82fb737e6b29b333c56d56477750094f5958ac86bd72ec749f8022990ab1f34b3d4da1701c9108b5495bafafc147f9097246c2f81d84ccf75', 'local:a0346f83cc808343', 1796126590986);
INSERT INTO public.tenant_keys VALUES ('legacy-a', 2, '\x898d212ad7fba6346957ec91ca56cffc8a38c873868a1edaee8c1cbbd57d7871fd9b3380a25cf64b0c3a11ff4406d07f62cf7d557676a4db573cc01e', 'local:a0346f83cc808343', 1796126591479);


--
-- Data for Name: tenants; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.tenants VALUES ('legacy-b', 1796126590986, 1, NULL, '\xfec31d0ea7acb0e313e68576b07ed5ebdb41037362c748ecab8ce9c3ef5d7615f0f694c0c57ae9660888a535abb63177ae03deb6e626c1c62785f71e', 'local:a0346f83cc808343', 'shared', NULL, NULL, NULL, '{"rotation_period_seconds":0,"retention_seconds":0,"min_decrypt_version":0,"max_items_per_second":0,"burst":0,"max_plaintext_bytes":0}');
INSERT INTO public.tenants VALUES ('legacy-a', 1796126590751, 2, NULL, '\xb5b9e7f6c42e4c95973ce2919e882e716ad65a973a9ab181df2064e4fc5e1186e93e56bf8db0e66ffc4bb7725c15bbbc640cf6c74218bd6285caff1c', 'local:a0346f83cc808343', 'shared', NULL, NULL, NULL, '{"rotation_period_seconds":0,"retention_seconds":0,"min_decrypt_version":0,"max_items_per_second":0,"burst":0,"max_plaintext_bytes":0}');


--
-- Name: _sqlx_migrations _sqlx_migrations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public._sqlx_migrations
    ADD CONSTRAINT _sqlx_migrations_pkey PRIMARY KEY (version);


--
-- Name: audit_head audit_head_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit_head
    ADD CONSTRAINT audit_head_pkey PRIMARY KEY (only_row);


--
-- Name: audit_log audit_log_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (seq);


--
-- Name: destroyed_versions destroyed_versions_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.destroyed_versions
    ADD CONSTRAINT destroyed_versions_pkey PRIMARY KEY (tenant_id, version);


--
-- Name: subject_keys subject_keys_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.subject_keys
    ADD CONSTRAINT subject_keys_pkey PRIMARY KEY (tenant_id, subject_key_id);


--
-- Name: subject_tombstones subject_tombstones_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.subject_tombstones
    ADD CONSTRAINT subject_tombstones_pkey PRIMARY KEY (tenant_id, subject_key_id);


--
-- Name: tenant_keys tenant_keys_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.tenant_keys
    ADD CONSTRAINT tenant_keys_pkey PRIMARY KEY (tenant_id, version);


--
-- Name: tenants tenants_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.tenants
    ADD CONSTRAINT tenants_pkey PRIMARY KEY (tenant_id);


--
-- Name: subject_keys_by_version; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX subject_keys_by_version ON public.subject_keys USING btree (tenant_id, tenant_version);


--
-- Name: audit_log audit_log_append_only; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER audit_log_append_only BEFORE DELETE OR UPDATE ON public.audit_log FOR EACH ROW EXECUTE FUNCTION public.audit_log_is_append_only();


--
-- Name: destroyed_versions destroyed_versions_tenant_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.destroyed_versions
    ADD CONSTRAINT destroyed_versions_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(tenant_id);


--
-- Name: subject_keys subject_keys_tenant_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.subject_keys
    ADD CONSTRAINT subject_keys_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(tenant_id);


--
-- Name: subject_tombstones subject_tombstones_tenant_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.subject_tombstones
    ADD CONSTRAINT subject_tombstones_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(tenant_id);


--
-- Name: tenant_keys tenant_keys_tenant_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.tenant_keys
    ADD CONSTRAINT tenant_keys_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(tenant_id);


--
-- PostgreSQL database dump complete
--


